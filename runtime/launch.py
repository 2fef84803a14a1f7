"""The installed commands (pyproject.toml's entry points): each spawns fast mode's kernel
precompile child (runtime/early.py) first, then imports its program (torch, the model code,
Gradio: seconds) and runs it, handing the child over."""
import sys

from runtime import early


def canny2image():
    """`canny2image`: runtime/cli.py."""
    child = early.spawn(sys.argv[1:])
    from runtime import cli
    return cli.main(sys.argv[1:], early=child)


def canny2image_demo():
    """`canny2image-demo`: gradio_canny2image.py."""
    child = early.spawn(sys.argv[1:])
    import gradio_canny2image
    return gradio_canny2image.main(sys.argv[1:], early=child, exiting=True,
                                   prog="canny2image-demo")
