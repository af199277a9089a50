"""Entry point of a study: ``python tune.py [--config experiments/X.yaml] [key=value ...]``.

On a cluster: ``ray job submit --working-dir . -- python tune.py --config experiments/xd_violence.yaml``.
On one machine with no argument it runs the embedded default (experiments/default.yaml).
Same as ``tmad-ray tune``.
"""

import sys

from tmad_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
