"""ReBrain entry point: the MONAI Label app, and the command line.

``monailabel start_server --app . --studies DIR_OR_DICOMWEB_URL [--conf NAME VALUE ...]`` loads
this file as the module ``main`` and takes the :class:`~app.server.app.ReBrainApp` it finds here
(see README, "Server"). ``python main.py <command>`` runs the command line (see
``python main.py --help``), which never imports MONAI Label or FastAPI: only the server needs them.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from app.cli import main

    sys.exit(main())
else:
    # MONAI Label looks the MONAILabelApp subclass up among this module's names.
    from app.server.app import ReBrainApp

    __all__ = ["ReBrainApp"]
