"""Ray Job entrypoint of the `crawl` stage: `emoji-ldm crawl` with the same flags.

Safe to re-run: finished shards are skipped.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/crawl.py --profile discords --tag Blobs --pages 1-1000 --out s3://emoji/datasets/blobs
"""

import sys

from emoji_ldm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["crawl", *sys.argv[1:]]))
