"""Recipes that build the project's own artefacts (the bundled demo model)."""
