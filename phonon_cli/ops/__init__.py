"""Operations on a running deployment: ``status`` (read-only) and ``flush``."""
