"""Named queries of the task layer, one module per aggregate (images, listings, jobs, inbox, …).

Every function takes the caller's ``Session`` first, runs inside the caller's transaction and
only flushes; the caller owns the commit (``tenant_session`` / ``job_session`` / ``system_session``).
The task layer builds no SQL of its own: it calls these and works with the rows they return.
"""
