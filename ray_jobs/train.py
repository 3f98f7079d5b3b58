"""Ray Job entrypoint of the `train` stage: `emoji-ldm train` with the same flags.

    ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/train.py --help
"""

import sys

from emoji_ldm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
