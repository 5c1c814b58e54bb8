"""The MONAI Label front end: the ``rebrain`` infer task, its settings and its result store.

``main.py`` holds the app class (``ReBrainApp``) that ``monailabel start_server --app .`` loads;
everything it needs lives here, over :mod:`lib.pipeline` (no second copy of the method).
"""
