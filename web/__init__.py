"""The review web page: a worklist of flagged studies, study pages with their images, one-key
decisions appended to ``reviews``, a dashboard and a CSV export (``cxr-screen web``).

It sits on top of the other packages: it reads the SQL views (``v_worklist``,
``v_study_results``, ``v_instance_outcomes``, ``v_reviews``, ``v_run_summary``) and
``web_users``, appends reviews through ``sql.reviews``, and reads its settings from the
environment (``CXR_SCREEN_*``, :mod:`web.settings`). Nothing else imports it.
"""
