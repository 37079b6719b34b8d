"""
Queue backends: the embedded journal, Redis and Kestrel.
"""
