"""The one base class of defectflow's user-facing errors (bad input, bad params)."""


class DefectflowError(ValueError):
    """Bad input or configuration; the message names the file or key and the problem."""
