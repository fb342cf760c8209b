"""In-process fakes of upstream services, for grokgate's tests."""
