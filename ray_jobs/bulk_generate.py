"""Ray Job entrypoint of the `bulk` stage: `emoji-ldm bulk` with the same flags.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/bulk_generate.py --model s3://bucket/run --prompts s3://bucket/prompts.txt --out s3://bucket/bulk
"""

import sys

from emoji_ldm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bulk", *sys.argv[1:]]))
