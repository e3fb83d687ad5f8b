"""Placeholders for the torchvision names the stand-in does not implement."""


class StandInError(RuntimeError):
    """A torchvision feature was used under the test-only stand-in."""


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise StandInError(f"torchvision.{cls.__qualname__} was called, but this process runs the test-only "
                           "torchvision stand-in (tests/torchvision_standin), which implements only what "
                           "timm's model code imports; install a torchvision that matches torch to use it")


def _make(qualname: str):
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


def placeholder_module_getattr(module_name: str):
    prefix = module_name.split(".", 1)[1] + "." if "." in module_name else ""

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(prefix + name)
    return __getattr__
