"""Pure domain logic: no web framework, no SQL, no engine imports."""
