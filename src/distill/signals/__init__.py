"""Where the teacher's output comes from (live forward pass now; caches, ensembles and noise plug in here)."""

from distill.signals.ensemble import TeacherEnsemble
from distill.signals.live import LiveTeacher

__all__ = ["LiveTeacher", "TeacherEnsemble"]
