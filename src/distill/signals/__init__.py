"""Where the teacher's output comes from: a live forward pass, a cache on disk, several teachers as one,
or a generalist with specialists."""

from distill.signals.cache import CachedDataset, CachedTeacher, open_cache, write_cache
from distill.signals.ensemble import TeacherEnsemble
from distill.signals.live import LiveTeacher

__all__ = ["CachedDataset", "CachedTeacher", "LiveTeacher", "TeacherEnsemble", "open_cache", "write_cache"]
