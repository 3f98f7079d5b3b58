"""Ray Job entrypoint of the `build` stage: `emoji-ldm dataset build` with the same flags (a new dataset version).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/build_dataset.py --source twemoji --out s3://emoji/datasets/twemoji

Inside a Ray Job RAY_ADDRESS is set, so the build joins the cluster; S3
settings come from the standard AWS variables.
"""

import sys

from emoji_ldm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["dataset", "build", *sys.argv[1:]]))
