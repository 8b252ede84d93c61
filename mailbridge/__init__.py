"""mailbridge: staff e-mail documents to a sharing address; recipients claim them in a portal."""

__version__ = "0.1.0"
