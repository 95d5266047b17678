"""The operator dashboard: an admin JSON API over the store and one page of Plotly charts, served by the gateway.

    gw.http_extensions.append(admin_extension(store, gw.auth.authenticate, publish=sink.publish))
"""

from feedback.dashboard.api import ACTIONS, admin_extension, build_admin_router, plotly_js

__all__ = ["ACTIONS", "admin_extension", "build_admin_router", "plotly_js"]
