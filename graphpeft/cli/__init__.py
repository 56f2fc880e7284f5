"""The ``graphpeft`` command line: click commands over the runtime and export.

``commands`` is the entry point (``main``); ``options`` builds the per-method options from the configs;
``params`` the click building blocks; ``generate`` holds ``graphpeft generate`` and ``graphpeft merge``;
``report`` and ``pictures`` say what a rewrite did. Training itself is the runtime's (``runtime.train``).
"""
