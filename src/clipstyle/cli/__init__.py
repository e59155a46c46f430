"""The ``clipstyle`` command. Thin: each command is one call into the library.

Commands are imported only when used and torch only inside them, so
``clipstyle --help`` answers at once. The top layer: it may import every
other (the web app included, for ``clipstyle serve``); only ``__main__``
imports it.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from clipstyle import __version__

COMMANDS = {
    "run": ("clipstyle.cli.run", "run", "Restyle images after text prompts."),
    "apply": ("clipstyle.cli.apply", "apply", "Restyle images with a saved style, in one pass each."),
    "bench": ("clipstyle.cli.bench", "bench", "Time optimisation steps and compare with the compute floor."),
    "score": ("clipstyle.cli.score", "score", "Score stylized images: CLIP, patch CLIP, content metrics."),
    "sheet": ("clipstyle.cli.sheet", "sheet", "A contact sheet of images x prompts, with scores."),
    "mask": ("clipstyle.cli.mask", "mask", "Write the mask --where makes, to check, edit and reuse."),
    "serve": ("clipstyle.cli.serve", "serve", "A local web app: make, watch, keep and queue stylizations."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name, (module, _, _) in COMMANDS.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                return None
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("clipstyle: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence for users
            from clipstyle import interrupts

            if interrupts.requested():  # an interrupt that a library turned into another error
                click.echo("clipstyle: interrupted", err=True)
                raise click.exceptions.Exit(130) from None
            if (ctx.obj or {}).get("debug"):
                raise
            from clipstyle.cli.common import UserError

            raise UserError(exc) from None

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="clipstyle")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx, debug):
    """Restyle a photo from a sentence (CLIPstyler: text-driven style transfer with CLIP).

    \b
        clipstyle run --prompt "starry night" photo.jpg
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(args=None) -> None:
    """The command, with signals handled from here on (clipstyle.interrupts)."""
    from clipstyle import interrupts

    interrupts.install()
    cli(args)
