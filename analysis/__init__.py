"""Figures and the HTML report for a study."""
from __future__ import annotations
