"""Built-in cache policies, one file each. Importing a module registers its policy; the core also
finds them through the ``kvpolicy.policies`` entry-point group without importing this package."""
