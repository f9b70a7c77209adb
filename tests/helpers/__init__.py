"""What many test files share: ``ranks`` (start N rank processes of a worker script with a timeout),
``scripts`` (load a tool, launch script or worker file as a module; the repository root). Imported as
``tests.helpers`` (tests/conftest.py puts the repository root on sys.path)."""
