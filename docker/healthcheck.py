"""Container health check (standard library only): GET ``$CXR_SCREEN_HEALTHCHECK_URL``.

Long-running services set the URL to their health route: the Prefect server's
``http://127.0.0.1:4200/api/health``, a worker's ``http://127.0.0.1:8080/health`` (started with
``prefect worker start --with-healthcheck``). Healthy when it answers 200. Without a URL the
container runs a one-shot command (``cxr-screen screen ...``) with no service to check, and
counts as healthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float = 8.0) -> str | None:
    """None when ``url`` answers 200, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url} did not answer: {getattr(exc, 'reason', exc)}"


def main() -> int:
    url = os.environ.get("CXR_SCREEN_HEALTHCHECK_URL", "").strip()
    if not url:
        return 0
    problem = check(url)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
