"""Repository-level pytest configuration: the self-tests drive pytest with pytester."""

pytest_plugins = ["pytester"]
