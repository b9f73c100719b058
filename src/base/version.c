/*
 * version.c: the version and commit of this build, from the header the build writes
 * (Makefile: $(BUILD)/gen/version.h, rewritten only when they change).
 */
#include "base/base.h"
#include "version.h"

const char tly_version[] = TALLY_VERSION;
const char tly_build_commit[] = TALLY_COMMIT;
