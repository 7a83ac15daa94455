"""Each flow's parameters, one module per flow: the single definition of a parameter's type,
bounds, default and help.

A module here holds one stub function whose signature *is* the flow's parameter model;
the flow takes it over with :func:`weakseg.flows._params.with_parameters` (and names the
parameters it uses, checked at import), Prefect builds the deployment's schema and
validation from the result, and the command line builds its options and validates them
from the stub alone. These modules import neither torch nor Prefect, so ``weakseg --help``,
``weakseg COMMAND --help`` and option errors answer at once. Adding a parameter: define it
here, name it in the flow's ``def`` and use it.
"""
