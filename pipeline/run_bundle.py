"""``python -m pipeline.run_bundle``: predict a folder of images with an exported bundle.

Never imports TensorFlow for a framework-free bundle (OpenVINO IR). Writes a validated
submission (``--out``; rows in ``--sample-submission``'s order when given, scored against
``--truth`` when given), one PNG mask per image and class at each image's own size
(``--masks``) and the masks drawn over the images (``--overlays``). The bundle also runs
without foldseg: ``python <bundle>/runner/run_bundle.py`` takes the same options
(docs/deploy.md).
"""

from __future__ import annotations

import sys

from pipeline.run.bundle_run import add_arguments, run_from_args
from pipeline.run.command import Command

COMMAND = Command(
    stage="run-bundle",
    description=__doc__,
    add_arguments=add_arguments,
    run=run_from_args,
    uses_config=False,
    examples=(
        "--bundle runs/demo/bundle --images data/demo/test_images --out bundle.csv",
        "--bundle runs/demo/bundle --images my_photos --masks masks --overlays overlays",
    ),
)

main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
