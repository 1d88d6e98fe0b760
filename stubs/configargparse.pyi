"""Types for the part of configargparse (1.x, which ships none) that udp_encap_tun uses:
the parser classes cli.py subclasses and the calls it makes.  Extend it when the code
uses more of configargparse."""

import argparse
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import IO, Any

ConfigValue = str | list[str]

class ConfigFileParserException(Exception): ...

class ConfigFileParser:
    def get_syntax_description(self) -> str: ...
    def parse(self, stream: IO[str]) -> OrderedDict[str, ConfigValue]: ...
    def serialize(self, items: OrderedDict[str, ConfigValue]) -> str: ...

class DefaultConfigFileParser(ConfigFileParser): ...

class ArgumentParser(argparse.ArgumentParser):
    def __init__(
        self,
        prog: str | None = None,
        usage: str | None = None,
        description: str | None = None,
        epilog: str | None = None,
        parents: Sequence[argparse.ArgumentParser] = ...,
        formatter_class: type[argparse.HelpFormatter] = ...,
        prefix_chars: str = "-",
        fromfile_prefix_chars: str | None = None,
        argument_default: Any = None,
        conflict_handler: str = "error",
        add_help: bool = True,
        allow_abbrev: bool = True,
        exit_on_error: bool = True,
        *,
        add_config_file_help: bool = True,
        add_env_var_help: bool = True,
        auto_env_var_prefix: str | None = None,
        default_config_files: Sequence[str | os.PathLike[str] | Callable[[], IO[Any]]] = ...,
        ignore_unknown_config_file_keys: bool = False,
        config_file_parser_class: ConfigFileParser | type[ConfigFileParser] | None = None,
        args_for_setting_config_path: Sequence[str] = ...,
        config_arg_is_required: bool = False,
        config_arg_help_message: str = ...,
        args_for_writing_out_config_file: Sequence[str] = ...,
        write_out_config_file_arg_help_message: str = ...,
        config_file_open_func: Callable[[str], IO[Any]] = ...,
    ) -> None: ...
    def get_possible_config_keys(self, action: argparse.Action) -> list[str]: ...

ArgParser = ArgumentParser
