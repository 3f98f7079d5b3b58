"""Ray Job entrypoint of the `caption` stage: `emoji-ldm dataset caption` with the same flags.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/caption.py s3://bucket/datasets/mine --captioner qwen2.5-vl --num-gpus 1
"""

import sys

from emoji_ldm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["dataset", "caption", *sys.argv[1:]]))
