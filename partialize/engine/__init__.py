"""The conversion engine: discover -> plan -> apply. It finds, plans and swaps; it never knows an
operator's insides (operators convert themselves with ``from_module``)."""
