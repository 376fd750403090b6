// Status and Result are part of the public API (include/kestrel/status.h); library code keeps
// including them under this name.
#pragma once

#include "kestrel/status.h"
