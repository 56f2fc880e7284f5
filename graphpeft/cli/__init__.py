"""The ``graphpeft`` command line: click commands over the runtime and export.

``commands`` is the entry point (``main``); ``options`` builds the per-method options from the configs;
``generate`` holds ``graphpeft generate`` and ``graphpeft merge``; ``train`` runs transformers' Trainer;
``report`` and ``pictures`` say what a rewrite did.
"""
