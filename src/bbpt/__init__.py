import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the library logs; only an application (the CLI) configures
