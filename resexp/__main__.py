from resexp.cli import main

if __name__ == "__main__":  # not when a process of multiprocessing imports it
    main()
