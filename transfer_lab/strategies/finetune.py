from transfer_lab.strategies.base import Strategy


class Finetune(Strategy):
    """Parameter transfer: copy every source backbone weight, new head, train everything.

    The base class's ``build`` already copies the backbone; this class names the policy.
    """

    tasks = ("classification", "regression")
