"""Ray Job entrypoint of the `encode` stage: `emoji-ldm encode` with the same flags.

    ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/encode.py --help
"""

import sys

from emoji_ldm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
