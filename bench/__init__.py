"""`make bench`: tiercache's pathways measured side by side with the raw limits of the same machine."""
