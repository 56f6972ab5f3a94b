"""Registers ``optimum-cli hf-compress ...`` (installed as ``optimum/commands/register/hf_compress.py``).

optimum 2 loads every module in the ``optimum.commands.register`` namespace at CLI start, so this file only
declares the command; hf-compress itself is imported when the command runs.
"""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class HfCompressCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hf-compress", help="layer-wise compression (same commands as the hf-compress CLI)")

    @staticmethod
    def parse_args(parser):
        from hf_compress.cli.commands import build_parser

        build_parser(parser)

    def run(self):
        from hf_compress.cli.commands import dispatch

        dispatch(self.args)


REGISTER_COMMANDS = [HfCompressCommand]
