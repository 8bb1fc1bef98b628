"""Where the teacher's output comes from: a live forward pass, a cache on disk, several teachers as one,
or a generalist with specialists."""

from distill.signals.cache import write_cache
from distill.signals.cached import CachedDataset, CachedTeacher, TeacherCache, open_cache
from distill.signals.ensemble import TeacherEnsemble
from distill.signals.live import LiveTeacher
from distill.signals.specialists import GeneralistWithSpecialists, find_class_sets, train_specialists

__all__ = ["CachedDataset", "CachedTeacher", "GeneralistWithSpecialists", "LiveTeacher", "TeacherCache", "TeacherEnsemble",
           "find_class_sets", "open_cache", "train_specialists", "write_cache"]
