"""Errors about the data a fit reads: :mod:`unlearn_hf.data` raises them naming the example, batch or column,
and a fit puts the data set's role in front ("The retain data: Example 3 is a NoneType ...")."""


class DataError(ValueError):
    """The data a fit reads cannot be used (the message names the example, batch or column); a fit puts the data
    set's role in front ("The retain data: ...")."""


class DataTypeError(TypeError):
    """The data a fit reads is of the wrong kind (see :class:`DataError`)."""
