"""moebits: dynamic expert precision for Mixture-of-Experts inference.

The top-level folders of the repository install under this one namespace (setuptools'
package-dir mapping; the folders do not move): ``moebits.core``, ``moebits.traces``,
``moebits.policies``, ``moebits.sim``, ``moebits.runtime``, ``moebits.analysis``.
``moebits SUB ...`` (see :mod:`moebits.cli`) runs each package's command line.
"""

__version__ = "0.1.0"
