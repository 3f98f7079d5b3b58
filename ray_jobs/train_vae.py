"""Ray Job entrypoint of the `train-vae` stage: `emoji-ldm train-vae` with the same flags.

    ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/train_vae.py --help
"""

import sys

from emoji_ldm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train-vae", *sys.argv[1:]]))
