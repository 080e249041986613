"""Hooks and optimizer constructors."""
