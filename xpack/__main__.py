from xpack.packager.cli import main

main()
