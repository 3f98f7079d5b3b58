"""Ray Job entrypoint of the `dreambooth` stage: `emoji-ldm dreambooth` with the same flags.

    ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/dreambooth.py --help
"""

import sys

from emoji_ldm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["dreambooth", *sys.argv[1:]]))
