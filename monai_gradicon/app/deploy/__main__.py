"""``python -m monai_gradicon.app.deploy -i INPUT -o OUTPUT -m MODEL`` (also the entry of a packaged app folder)."""

import sys

from monai_gradicon.app.deploy.app import main

if __name__ == "__main__":
    sys.exit(main())
