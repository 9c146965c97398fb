"""The built-in tornado-rt plugins (installed as the package ``tornado_rt_plugins``).

Each module exposes ``plugin``, a :class:`tornado_rt.Plugin` built with the public API only.
"""
