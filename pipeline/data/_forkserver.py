"""Loaded by the loader's fork server (pipeline.data.workers) before it forks any worker; nothing else imports
it: the workers then start with torch and the modules their readers unpickle into already loaded."""

import pipeline.data.loader  # noqa: F401
import pipeline.data.transforms  # noqa: F401
