"""The e-mail and portal templates, shipped inside the package as `mailbridge.templates`
(read with importlib.resources); kept at the top of the repository so rebranding is one place."""
