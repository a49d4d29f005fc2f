"""cxrscale's ground floor: what every stage and launcher shares, and nothing of any stage.

The toolkit's own stages (`preprocessing`, `distributed`, `optimize`) and its launchers (`launch`,
`benchmarks`) all import from here; this package imports none of them, so every arrow between the packages
points down. It holds the version (the one place it is set; setup.cfg reads it) and:

    errors       CxrError, the user-mistake type, and the exit status it maps to
    cli          the rank-aware CLI runner and the one-line argument parser every entry point uses
    console      one log format and the quiet console (TensorFlow's native start-up lines held back)
    files        atomic files and folders, JSON/CSV/options readers, checksums
    provenance   library versions and the git commit a run records
    ray_cluster  starting or joining Ray
    tracking     MLflow tracking for every stage (--tracking-uri)
    figures      the one figure style and figure files of every report

No TensorFlow is imported here.
"""

__version__ = "0.2.0"
