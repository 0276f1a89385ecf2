"""Test doubles for hardware only (DESIGN.md: "Only hardware is faked")."""
