"""ReBrain entry point.

``python main.py <command>`` runs the command line (see ``python main.py --help``). The
MONAI Label app class (``ReBrainApp``) that ``monailabel start_server --app .`` loads from
this file arrives with the server issue.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from app.cli import main

    sys.exit(main())
