"""Build hook: generate the protobuf/gRPC modules from proto/ so that wheels and installs carry them."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProto(build_py):
    def run(self) -> None:
        from kvd_build import generate_proto

        generate_proto()
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
